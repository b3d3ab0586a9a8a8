"""FHIR REST over the index: ImagingStudy read and search, R4 at /fhir/r4 and
R5 at /fhir/r5, JSON only. The resources are those `imaging-scp fhir` renders
(storage.fhir); this module adds what HTTP needs: versions, paging, errors.

- `meta.versionId`: a digest of what a study's last change moves (its last
  instance, counts, availability, states, commitment and incomplete marks);
  `meta.lastUpdated`: the latest of its last instance's arrival, its last
  other change (`changed_at`: an availability, commitment or completeness
  change, a series deleted) and the moment it became stable
  (`storage.catalog.reads.study_updated`), which `_lastUpdated` searches.
  `ETag` is `W/"versionId"`; `If-None-Match` gets 304.
- Search pages by keyset (the last row's sort value and Study UID ride in the
  `_page` token), not by offset: a page stays right while studies arrive.
  Results carry series but not instances (tagged SUBSETTED); a read carries all.
- Errors are OperationOutcome resources; writes answer 405: the index is fed by
  DICOM only.
"""

import base64
import calendar
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from scp.config import Config
from scp.web import index
from storage.catalog.engines import moment_of
from storage.catalog.reads import CatalogReader, FilterError, StudyFilter, study_updated
from storage.fhir import (
    DICOM_SYSTEM,
    DICOM_UID_SYSTEM,
    STATUS_BY_AVAILABILITY,
    render_imaging_study,
)

FHIR_JSON = "application/fhir+json"
FHIR_VERSIONS = {"r4": "4.0.1", "r5": "5.0.0"}
DEFAULT_COUNT, MAX_COUNT = 50, 1000
SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
}
_UID = re.compile(r"[0-9.]{1,64}")
_ACCEPTED = ("application/fhir+json", "application/json", "application/json+fhir", "*/*")
_ACCEPTED_FORMATS = ("json", "application/fhir+json", "application/json")
# _sort value -> (column, descending); none given: by Study UID, which never changes.
_SORTS = {
    "started": ("study_date", False),
    "-started": ("study_date", True),
    "_lastUpdated": ("last_received", False),
    "-_lastUpdated": ("last_received", True),
}
# (name, FHIR type, documentation) for the CapabilityStatement; parsed in _search_terms.
SEARCH_PARAMETERS = (
    ("_id", "token", "Study Instance UID; a comma-separated list"),
    ("identifier", "token", "urn:dicom:uid|urn:oid:<Study UID>, an accession number or Study ID"),
    ("patient", "reference", "patient:identifier=[system|]<Patient ID>"),
    ("subject", "reference", "subject:identifier=[system|]<Patient ID>"),
    ("started", "date", "eq, ge, le, gt, lt and partial dates; to the day (Study Date)"),
    ("modality", "token", "one code, with or without the DICOM system"),
    ("series", "token", "a Series Instance UID"),
    ("status", "token", "available or registered; a comma-separated list"),
    (
        "_lastUpdated",
        "date",
        "meta.lastUpdated: the last instance, availability, commitment or"
        " completeness change, or becoming stable; eq, ge, le, gt, lt",
    ),
)
# What _elements never drops: the resource's identity and its mandatory elements.
_ALWAYS_KEPT = ("resourceType", "id", "meta", "status", "subject")
_CONTROL = {"_sort", "_count", "_summary", "_elements", "_page", "_format"}


class SearchError(ValueError):
    """A search parameter that cannot be answered: 400 with this message."""


def outcome(status: int, code: str, diagnostics: str, headers: dict | None = None) -> Response:
    """An OperationOutcome with one issue, as the response with `status`."""
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }
    return JSONResponse(body, status, headers=headers, media_type=FHIR_JSON)


def routes(config: Config) -> list[Route]:
    """The FHIR endpoints under /fhir/{version}."""
    api = _FhirApi(config)
    return [
        Route("/fhir/{version}/metadata", api.metadata, methods=["GET"]),
        Route("/fhir/{version}/ImagingStudy/{id}", api.read, methods=["GET"]),
        Route("/fhir/{version}/ImagingStudy", api.search, methods=["GET"]),
        Route(
            "/fhir/{version}/{rest:path}",
            api.not_served,
            methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
        ),
    ]


def _refusal(request: Request) -> Response | None:
    """404 for a FHIR version we do not serve, 406 for a format."""
    version = request.path_params["version"]
    if version not in FHIR_VERSIONS:
        return outcome(404, "not-found", f"no FHIR version {version!r} here: r4 or r5")
    wanted = request.query_params.get("_format")
    if wanted is not None and wanted not in _ACCEPTED_FORMATS:
        return outcome(406, "not-supported", f"_format={wanted}: JSON only")
    accept = request.headers.get("accept")
    if accept and not any(kind in accept for kind in (*_ACCEPTED, "application/*")):
        return outcome(406, "not-supported", f"Accept: {accept}: {FHIR_JSON} only")
    return None


@dataclass
class _Search:
    filters: StudyFilter
    order: str = "study_uid"
    descending: bool = False
    count: int = DEFAULT_COUNT
    count_only: bool = False
    elements: tuple[str, ...] = ()
    ignored: list[str] = field(default_factory=list)


class _FhirApi:
    def __init__(self, config: Config):
        self._config = config

    def _reader(self) -> CatalogReader:
        return index.reader(self._config)

    def _render(self, found: dict, version: str, *, with_instances: bool) -> dict:
        series = found["series"]
        instances = {s["series_uid"]: s["instances"] for s in series} if with_instances else None
        resource = render_imaging_study(
            found,
            series,
            instances,
            version,
            wado_base_url=self._config.wado_url,
            site_timezone=self._config.site_timezone,
        )
        version_id, last_updated = study_version(found, self._config.stable_after)
        meta = {"versionId": version_id, "lastUpdated": last_updated}
        if not with_instances:
            meta["tag"] = [SUBSETTED]
        return {
            "resourceType": resource.pop("resourceType"),
            "id": resource.pop("id"),
            "meta": meta,
            **resource,
        }

    def metadata(self, request: Request) -> Response:
        refused = _refusal(request)
        if refused:
            return refused
        return JSONResponse(
            capability_statement(request.path_params["version"], self._config.web_url),
            media_type=FHIR_JSON,
        )

    def read(self, request: Request) -> Response:
        refused = _refusal(request)
        if refused:
            return refused
        version, uid = request.path_params["version"], request.path_params["id"]
        found = None
        if _UID.fullmatch(uid):
            with self._reader() as reader:
                found = reader.study(uid, self._config.stable_after, with_instances=True)
        if found is None:
            return outcome(404, "not-found", f"ImagingStudy/{uid} is not in the index")
        resource = self._render(found, version, with_instances=True)
        headers = {
            "ETag": f'W/"{resource["meta"]["versionId"]}"',
            "Last-Modified": _http_date(resource["meta"]["lastUpdated"]),
        }
        if headers["ETag"] in _tags(request.headers.get("if-none-match")):
            return Response(status_code=304, headers=headers)
        return JSONResponse(resource, headers=headers, media_type=FHIR_JSON)

    def search(self, request: Request) -> Response:
        refused = _refusal(request)
        if refused:
            return refused
        version = request.path_params["version"]
        strict = "handling=strict" in request.headers.get("prefer", "").replace(" ", "")
        try:
            terms = _search_terms(request.query_params.multi_items(), self._config.stable_after)
            if terms.ignored and strict:
                raise SearchError(f"unknown search parameter(s): {', '.join(terms.ignored)}")
            page = _page_token(request.query_params.get("_page"))
            with self._reader() as reader:
                total = reader.count_studies(terms.filters)
                found, links = [], []
                if not terms.count_only and terms.count:
                    found, links = self._page(reader, terms, page, request)
        except (SearchError, FilterError) as exc:
            return outcome(400, "invalid", str(exc))
        base = self._config.web_url + f"/fhir/{version}/ImagingStudy"
        entries = []
        for study in found:
            resource = self._render(study, version, with_instances=False)
            if terms.elements:
                keep = {*_ALWAYS_KEPT, *terms.elements}
                resource = {k: v for k, v in resource.items() if k in keep}
            entries.append(
                {
                    "fullUrl": f"{base}/{study['study_uid']}",
                    "resource": resource,
                    "search": {"mode": "match"},
                }
            )
        if terms.ignored:
            entries.append(
                {
                    "resource": {
                        "resourceType": "OperationOutcome",
                        "issue": [
                            {
                                "severity": "warning",
                                "code": "not-supported",
                                "diagnostics": f"ignored: {name}",
                            }
                            for name in terms.ignored
                        ],
                    },
                    "search": {"mode": "outcome"},
                }
            )
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": total}
        bundle["link"] = [{"relation": "self", "url": self._url(request, None)}, *links]
        if entries:
            bundle["entry"] = entries
        return JSONResponse(bundle, media_type=FHIR_JSON)

    def _page(self, reader, terms: _Search, page: dict | None, request: Request):
        """The page's studies and its next/previous links. A `previous` token
        (b) reads backwards from the first row of the page it came from."""
        backwards = bool(page and page.get("b"))
        after = (page["k"], page["u"]) if page else None
        rows = reader.study_page(
            terms.filters,
            self._config.stable_after,
            order=terms.order,
            descending=terms.descending != backwards,
            after=after,
            count=terms.count + 1,
        )
        more = len(rows) > terms.count
        rows = rows[: terms.count]
        if backwards:
            rows.reverse()
        links = []
        if rows and (more or backwards):
            last = rows[-1]
            token = {"k": last.get(terms.order) or "", "u": last["study_uid"]}
            links.append({"relation": "next", "url": self._url(request, token)})
        if rows and page is not None and (more or not backwards):
            first = rows[0]
            token = {"k": first.get(terms.order) or "", "u": first["study_uid"], "b": 1}
            links.append({"relation": "previous", "url": self._url(request, token)})
        return rows, links

    def _url(self, request: Request, token: dict | None) -> str:
        params = [(k, v) for k, v in request.query_params.multi_items() if k != "_page"]
        if token is not None:
            raw = json.dumps(token, separators=(",", ":")).encode()
            params.append(("_page", base64.urlsafe_b64encode(raw).decode().rstrip("=")))
        query = urlencode(params)
        return self._config.web_url + request.url.path + (f"?{query}" if query else "")

    def not_served(self, request: Request) -> Response:
        if request.path_params["version"] not in FHIR_VERSIONS:
            return outcome(404, "not-found", "no such FHIR version here: r4 or r5")
        if request.method not in ("GET", "HEAD"):
            return outcome(
                405,
                "not-supported",
                f"{request.method}: read only; the index is fed by DICOM",
                headers={"Allow": "GET"},
            )
        return outcome(404, "not-supported", f"{request.url.path}: only ImagingStudy is served")


def study_version(found: dict, stable_after: float) -> tuple[str, str]:
    """(versionId, lastUpdated) of a study read with its series."""
    series = found["series"]
    moved = [
        found.get(name)
        for name in ("last_received", "changed_at", "number_of_instances", "availability", "state")
    ]
    for row in series:
        moved += [
            row.get(name)
            for name in (
                "series_uid",
                "availability",
                "state",
                "committed_at",
                "incomplete_since",
                "incomplete_reason",
            )
        ]
    version_id = hashlib.sha256(json.dumps(moved, default=str).encode()).hexdigest()[:16]
    return version_id, study_updated(found, stable_after)


def _tags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {
        tag.strip() if tag.strip().startswith("W/") else "W/" + tag.strip()
        for tag in header.split(",")
    }


def _http_date(moment: str) -> str:
    parsed = moment_of(moment)
    return parsed.astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def _page_token(value: str | None) -> dict | None:
    if value is None:
        return None
    try:
        token = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
        if not (isinstance(token["k"], str) and _UID.fullmatch(token["u"])):
            raise ValueError
    except (ValueError, KeyError, TypeError) as exc:
        raise SearchError("_page: not a page token of this server") from exc
    return token


# --- search parameters ---------------------------------------------------------------------

_PREFIXED = re.compile(r"(eq|ne|gt|lt|ge|le|sa|eb|ap)?(\d{4}.*)")
_DATE_TIME = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6})\d*)?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?"
)


def _search_terms(items: list[tuple[str, str]], stable_after: float) -> _Search:
    """The search's filter and controls from its query parameters."""
    search = _Search(StudyFilter(stable_after=stable_after))
    filters: dict = {}
    started_from: list[date] = []
    started_to: list[date] = []
    for name, value in items:
        if "\0" in value:  # PostgreSQL refuses it in a parameter; no index value holds one
            raise SearchError(f"{name}: a NUL character is part of no value")
        if name == "_id":
            _narrow(filters, "study_uids", value.split(","))
        elif name == "identifier":
            _identifier(filters, value)
        elif name in ("patient:identifier", "subject:identifier"):
            filters["patient_id"] = value.rpartition("|")[2]
        elif name == "started":
            prefix, start, end = _prefixed_range(name, value)
            lower, upper = start.date(), (end - timedelta(microseconds=1)).date()
            if prefix in ("eq", "ge", "gt"):
                started_from.append(upper + timedelta(days=1) if prefix == "gt" else lower)
            if prefix in ("eq", "le", "lt"):
                started_to.append(lower - timedelta(days=1) if prefix == "lt" else upper)
        elif name == "modality":
            if "," in value:
                raise SearchError("modality: one code at a time")
            system, bar, code = value.rpartition("|")
            if bar and system != DICOM_SYSTEM:
                _narrow(filters, "study_uids", [])
            filters["modality"] = code
        elif name == "series":
            filters["series_uid"] = value.rpartition("|")[2].removeprefix("urn:oid:")
        elif name == "status":
            wanted = set(value.split(","))
            filters["availabilities"] = tuple(
                a for a, status in STATUS_BY_AVAILABILITY.items() if status in wanted
            )
        elif name == "_lastUpdated":
            prefix, start, end = _prefixed_range(name, value)
            if prefix in ("eq", "ge", "gt"):
                filters["updated_since"] = (end if prefix == "gt" else start).isoformat()
            if prefix in ("eq", "le", "lt"):
                filters["updated_before"] = (start if prefix == "lt" else end).isoformat()
        elif name == "_sort":
            if value not in _SORTS:
                raise SearchError(f"_sort: one of {', '.join(_SORTS)}, got {value!r}")
            search.order, search.descending = _SORTS[value]
        elif name == "_count":
            if not value.isdecimal() or int(value) > MAX_COUNT:
                raise SearchError(f"_count: 0 to {MAX_COUNT}, got {value!r}")
            search.count = int(value)
        elif name == "_summary":
            if value != "count":
                raise SearchError(f"_summary: only 'count' is supported, got {value!r}")
            search.count_only = True
        elif name == "_elements":
            search.elements = tuple(e.strip() for e in value.split(",") if e.strip())
        elif name not in _CONTROL:
            search.ignored.append(name)
    if started_from:
        filters["date_from"] = max(started_from).strftime("%Y%m%d")
    if started_to:
        filters["date_to"] = min(started_to).strftime("%Y%m%d")
    search.filters = replace(search.filters, **filters)
    return search


def _narrow(filters: dict, key: str, uids: list[str]) -> None:
    """Study UIDs a parameter allows, intersected with what others allowed."""
    uids = [uid.strip() for uid in uids if uid.strip()]
    previous = filters.get(key)
    filters[key] = tuple(u for u in uids if previous is None or u in previous)


def _identifier(filters: dict, value: str) -> None:
    system, bar, code = value.partition("|") if "|" in value else ("", "", value)
    if system == DICOM_UID_SYSTEM or (not system and code.startswith("urn:oid:")):
        _narrow(filters, "study_uids", [code.removeprefix("urn:oid:")])
    elif not system:  # accession numbers and Study IDs have no system
        filters["other_identifier"] = code
    else:
        _narrow(filters, "study_uids", [])


def _prefixed_range(name: str, value: str) -> tuple[str, datetime, datetime]:
    """The prefix and the [start, end) a partial date/time covers (UTC when it
    has no offset)."""
    match = _PREFIXED.fullmatch(value)
    parts = _DATE_TIME.fullmatch(match.group(2)) if match else None
    if parts is None:
        raise SearchError(f"{name}: expected [eq|ge|le|gt|lt]YYYY[-MM[-DD[Thh:mm[:ss]]]]")
    prefix = match.group(1) or "eq"
    if prefix not in ("eq", "ge", "le", "gt", "lt"):
        raise SearchError(f"{name}: prefix {prefix!r} is not supported (eq, ge, le, gt, lt)")
    year, month, day, hour, minute, second, fraction, offset = parts.groups()
    try:
        start = datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "0").ljust(6, "0")),
        )
        if offset and offset != "Z":
            start = datetime.fromisoformat(start.isoformat() + offset)
    except ValueError as exc:
        raise SearchError(f"{name}: {value!r} is not a date") from exc
    start = start.replace(tzinfo=start.tzinfo or UTC)
    if month is None:
        end = start.replace(year=start.year + 1)
    elif day is None:
        end = start + timedelta(days=calendar.monthrange(start.year, start.month)[1])
    elif hour is None:
        end = start + timedelta(days=1)
    elif fraction:  # a meta.lastUpdated as given, to its millisecond: what a poller sends
        end = start + timedelta(microseconds=10 ** (6 - len(fraction)))
    else:
        end = start + (timedelta(seconds=1) if second else timedelta(minutes=1))
    return prefix, start, end


# --- the CapabilityStatement -------------------------------------------------------------


def capability_statement(version: str, base_url: str) -> dict:
    """What this server answers, exactly: ImagingStudy read and search, JSON."""
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-12-07",
        "kind": "instance",
        "software": {"name": "imaging-scp"},
        "implementation": {
            "description": "imaging-scp: the index of received DICOM studies, read only",
            "url": f"{base_url}/fhir/{version}",
        },
        "fhirVersion": FHIR_VERSIONS[version],
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    "description": "Authorization: Bearer <token>, unless the service"
                    " listens on a loopback address without a tokens file"
                },
                "resource": [
                    {
                        "type": "ImagingStudy",
                        "interaction": [{"code": "read"}, {"code": "search-type"}],
                        "versioning": "versioned",
                        "readHistory": False,
                        "conditionalRead": "not-match",
                        "searchParam": [
                            {"name": n, "type": t, "documentation": d}
                            for n, t, d in SEARCH_PARAMETERS
                        ],
                    }
                ],
            }
        ],
    }

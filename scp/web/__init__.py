"""`imaging-scp web`: the index on HTTP, beside the DICOM listener. FHIR REST
(ImagingStudy, R4 and R5) and DICOMweb (scp.web.dicomweb); read through the catalog's
read API only (storage.catalog.reads.CatalogReader), rendered by
storage/fhir.py. An edge like the listener: the listener never imports it."""

"""What we encode and decode by hand, in one place.

- `syntax`: the transfer syntaxes' properties (explicit or implicit VR,
  endianness, deflated, encapsulated), one table.
- `elements`: encoding one element (the file meta group, C-FIND identifiers).
- `walk`: the walk of an encoded dataset, over a whole buffer or fed fragment
  by fragment as P-DATA arrives: it reads the elements asked for as pydicom
  reads them and proves the dataset complete, in one pass.
- `streams`: a dataset's bytes from a stream, lent without a copy or inflated.
- `dates`: DICOM DA and TM values read, one definition for the index and FHIR.
- `datasets`: the small datasets read with pydicom (identifiers, action
  information, a file's meta group), their values converted leniently.
"""

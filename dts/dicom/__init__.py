"""Owns DICOM on the network and on disk: the only package that knows pynetdicom's
internals or DICOM bytes.

- ``patches``: every change dts makes to pynetdicom, the supported versions, the check
- ``ae``: application entities, presentation contexts, TLS, C-ECHO, parking a reactor
- ``takeover``: keeping pynetdicom's DUL thread off a socket (both fast paths)
- ``scp``, ``scu``: the C-STORE fast paths (receiving, sending)
- ``store``: delivery of DICOM files to a peer (what ``dts send`` uses)
- ``wire``, ``dimse``: PDUs and command sets as bytes
- ``filemeta``, ``header``: a file's meta information and identity, read without pydicom
- ``uid``: what a valid UID is
"""

"""Vocabulary and I/O every other package uses: typed errors, YAML/JSON reading, file digests and atomic outputs, the format and GPU catalogs, output layout names, argument specs."""

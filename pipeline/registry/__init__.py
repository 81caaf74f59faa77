"""Artifact registries: the name and version rule, bundle metadata, directory/fsspec, OCI and plain-HTTP storage, tags, which artifact suits a GPU, and the registry options the verbs share."""

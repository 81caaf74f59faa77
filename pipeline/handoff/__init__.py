"""Stage handoffs and lineage: the manifest envelope, one closed details model per stage, the verifying reader, DVC metrics."""

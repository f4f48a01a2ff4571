"""Scale-out and reliability tests (issue 8): torchrun ranks, DDP, dask clusters, S3, faults."""

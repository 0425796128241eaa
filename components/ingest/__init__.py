"""Stage 1: img2dataset turns a URL list into webdataset shards in the object store."""

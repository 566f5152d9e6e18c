"""The references evaluate scores against (a subpackage of the evaluate stage).

`formats` opens every kind of reference (ADM batches, statistics-only `.npz`, image `.npz`, folders, raw shards) and
checks it before any sampling; `cache` names a reference by its content and caches its Inception features; `batch`
is `diffit-pipe reference`: streamed, resumable statistics and the ADM-layout `.npz`; `source` builds one from an
encode source (archives, parquet, WebDataset, folders) cropped as `pack` crops; `remote` copies a reference URL
once, each shard checked.
"""

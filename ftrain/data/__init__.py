"""Data: batches from loaders and lists (sharding, ordering, resume positions) and the
`ft.Data` bundle of splits."""

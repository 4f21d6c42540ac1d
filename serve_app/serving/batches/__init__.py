"""OpenAI's Batch API: files and batches kept in a store, run through the ingress at low priority.

- `format`: an input file's lines as checked at upload; the output and error lines;
- `store`: whole-object reads and writes, in a directory or an object store (fsspec);
- `runner`: one batch from where its store says it stands to its output files;
- `service`: the one-replica deployment that keeps every key's files and batches and runs them;
- `api`: the ingress's side of the routes (uploads read within bounds, the service's answers).
"""

"""Training data, one module per idea.

- ``ftedge.data.reading``: file readers (CSV, JSON/JSONL, Hugging Face datasets) and row formats, each
  row as a chat ``Example``;
- ``ftedge.data.splits``: the disjoint train / validation / test splits, frozen into a run at train time
  and read back by every later stage (``run_splits``);
- ``ftedge.data.encoding``: the chat template applied, tokenized rows with loss masks (``ChatEncoder``);
- ``ftedge.data.prompts``: held-out chat prompts for the merge drift check and the export parity gate.

Batching for the optimizer lives with the train stage (``ftedge.train.batch``).
"""

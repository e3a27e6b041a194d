"""Datasets: LLaVA-style conversations to H5 shards (``preprocess``, the Model Zoo's own YAML in
``modelzoo_preproc``), safe writing (``shard_writer``), the tokenizer's chat formatting
(``chat_format``), images (``images``) and the embedded default dataset (``synth``)."""

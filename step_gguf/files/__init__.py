"""Readers and writers of the files around a model: checkpoints, GGUFs and split sets, vocabularies,
imatrix files, model cards, MTP drafts and the journals that make jobs resumable."""

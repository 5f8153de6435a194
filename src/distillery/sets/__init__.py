"""The distilled set: its file (`synset`), pictures of it (`grid`), other codes' formats (`export`, `imports`),
and starting a run from one (`init_from`)."""

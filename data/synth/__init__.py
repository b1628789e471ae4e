"""Synthetic datasets with a planted model and a known oracle (``python -m data.synth KIND``).

* :mod:`data.synth.ctr` — ``ctr``: CTR rows from a planted FM-like click model;
* :mod:`data.synth.ctr2` — ``ctr2``: click and conversion (CTCVR = CTR × CVR) for multi-task heads;
* :mod:`data.synth.ctr_seq` — ``ctr_seq``: CTR whose main signal is in a behaviour sequence;
* :mod:`data.synth.next_item` — ``seq``: next-item sessions with an oracle HR@10 / NDCG@10;
* :mod:`data.synth.retrieval` — ``retrieval``: user/item rows from planted vectors with an
  oracle recall@K;
* :mod:`data.synth.common` — the Zipf sampler, segment sums and the planted-dataset writer
  they share; :mod:`data.synth.__main__` — the command line.

Every generator is deterministic by seed and writes its oracle metrics into ``meta.json``.
"""

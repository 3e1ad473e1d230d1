"""Harnesses around the product: benchmarks, fault injection (chaos), soak and the hostile-input corpus.

Apart from the runtime, as Apache Kafka keeps its tools/ and trogdor/ apart from its core: nothing in
mind/, indexer/, stream/ or workflows/ imports this package, and its extra dependencies (hypothesis, psutil)
come with the `harness` extra (`pip install 'mind-stream[harness]'`), not with the worker.
"""

"""The pure routing core: embedding, retrieval store, predictor, optimiser, evaluation.

Nothing in this package touches Kafka or a database; the stream and db layers call it.
"""

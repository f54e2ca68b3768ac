"""The Kafka edges: topic administration, Faust app and agents, model workers."""

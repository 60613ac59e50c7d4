"""Everything after training: the model behind an index (and its ONNX export), building and
editing indexes, answering queries, the Kaggle CSV, the HTML report, the warm service, heat-maps
and the gallery audit. It never imports ``retrieval.training``."""

"""Evaluation: pure metrics (``metrics``), feature extractors and the reference-statistics cache
(``features``), COCO caption selection (``coco``), named protocols (``protocols``), speed (``speed``)."""

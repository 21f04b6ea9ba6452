"""TorchServe's adapter over the core: the BaseHandler every .mar runs (handler.py), TorchServe's rows
(rows.py), KServe's v1 and v2 bodies (kserve.py), and its metric cache (metrics.py)."""

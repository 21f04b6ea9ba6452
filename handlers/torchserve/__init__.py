"""TorchServe's adapter over the core: the BaseHandler every .mar runs (handler.py), TorchServe's rows
and KServe service envelopes (envelopes.py), and its metric cache (metrics.py)."""

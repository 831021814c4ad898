"""Framework adapters: installed as ``gradwatch.integrations``."""

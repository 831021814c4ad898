"""gradwatch: watch gradient flow while a network trains."""

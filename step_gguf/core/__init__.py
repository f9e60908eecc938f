"""The bottom layer: the model's names and shapes, GGUF tensor names, recipes, model facts, units
and typed choices. Knows no file formats beyond a hub folder's layout."""

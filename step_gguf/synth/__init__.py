"""Synthetic Step 3.5/3.7 checkpoints in the exact hub layout: presets, scripted weights, a
tokenizer. Kept light: the CLI lists the presets without numpy."""

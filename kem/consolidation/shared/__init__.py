"""Math shared by ROME, MEMIT, AlphaEdit and FT-L: prompts and subject positions, keys, target values."""

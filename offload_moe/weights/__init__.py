"""Reading and writing weights: checkpoints through each family's name table, the packed folder, expert
sources on storage, `convert`, and the resident model built on the meta device."""

"""The losses, one private module per family; the public names live in `funcloss`."""

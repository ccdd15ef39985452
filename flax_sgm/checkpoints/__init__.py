"""What every family reads checkpoints through: sources (files, diffusers directories, shards, variants),
convert (the conversion-table engine: rows, strict load, back to torch names), converted (the directory
`flax-sgm convert` writes)."""

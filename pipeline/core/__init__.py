"""What every stage shares: the shard dataset format and manifests (`shards`), the VAE (`vae`), atomic files
(`atomic`), the error contract (`errors`), logging (`logs`) and image grids (`grids`)."""

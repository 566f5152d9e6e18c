"""What every stage shares: the shard dataset format and manifests (`shards`), the VAE (`vae`), atomic files
(`atomic`), local directories and object-store prefixes behind one interface (`storage`), the error contract
(`errors`), logging (`logs`) and image grids (`grids`)."""

"""Pure Nix formats: nixbase32, store paths, hashes, NAR, narinfo, signing keys."""

"""The Nix store on top of castore: PathInfo, NAR <-> castore, CLI, daemon."""

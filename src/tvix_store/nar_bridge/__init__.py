"""nar-bridge: the store as a Nix HTTP binary cache (``nix copy --to/--from``)."""

from tvix_store.nar_bridge.app import AppConfig, make_app

__all__ = ["AppConfig", "make_app"]

"""Shared test material for castore services and their consumers."""

"""Credentials: password hashing, JWTs and opaque tokens, each behind one small module."""

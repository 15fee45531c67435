# The library behind the `libra` command; its floors: docs/architecture.md (a comment, not a docstring: the
# code digest of an empty module stays unchanged, and DVC does not warn about an empty dependency).

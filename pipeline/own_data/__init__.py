"""A researcher's own data set: its statistics and warnings (``libra prepare``), the anchors' best possible
recall of its boxes, and a profile fitted to it (``libra fit-profile``). Walkthrough: docs/own-data.md."""

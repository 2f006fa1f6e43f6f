"""Course-only helpers: plots, diagrams, notebook set-up and the chapters' analyses."""

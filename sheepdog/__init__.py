"""sheepdog."""

"""A request's life in the database: its row recorded, its status moves, its end."""

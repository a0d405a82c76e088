//! The agent's link to the cache coordinator: registration, inventory, GC orders (issue 4).

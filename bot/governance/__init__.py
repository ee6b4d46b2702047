"""Before and after the emergency (contract section 7): each capability in its own module."""

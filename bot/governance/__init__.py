"""Before and after the emergency (contract section 7): each capability in its own module.

The post-incident review (reviews.py), the inventory of live grants and operator
revocation (inventory.py), alerts (alerts.py), drills, escalation and expiry
warnings. Use cases like those of bot/service.py: one transaction each, state +
audit + outbox together."""

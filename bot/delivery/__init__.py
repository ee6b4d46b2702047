"""The ways events leave the bot besides the Slack outbox dispatcher itself:
webhooks (signed JSON, PagerDuty), delivered as outbox rows of their own lanes."""

"""For development only: starting Redis, PostgreSQL and a Kafka-protocol broker for the demo and
the tests, and the demo itself. The product (``gateway serve``) never imports it."""

"""The request pipeline. Its stages, in order (written down in :mod:`.run`):

    authenticate -> parse -> route -> idempotency -> cache lookup
      -> admit (rate limits + budget reserve) -> forward (retries, fallbacks)
      -> settle -> record

One module per stage; :mod:`.context` is what a request carries through them."""

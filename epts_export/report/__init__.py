"""What a person looks at: the perplexity curve of an artifact (``curve``, drawn by ``plot``) and
the self-contained HTML reports of an export and a bundle (``html``, ``pages``)."""

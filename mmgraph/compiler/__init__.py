"""The compiler: the step traced to a Program (``trace``), the pass list (``pipeline``), the
program artifact (``artifact``), the vendor's check (``cirh``) and the N-system analysis
(``scaling``). Above ``passes`` and ``models``, below the runtime (docs/layering.md)."""

from mmgraph.cli import main

raise SystemExit(main())

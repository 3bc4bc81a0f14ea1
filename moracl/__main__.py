from moracl.cli import main

raise SystemExit(main())

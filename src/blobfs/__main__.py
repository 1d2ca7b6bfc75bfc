from blobfs.cli import main

raise SystemExit(main())

from nvq.cli import main

main()
